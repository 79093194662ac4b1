"""Extract English prose passages (40-200 words) from installed packages' descriptions.

Every installed Python distribution ships its README as the body of ``*.dist-info/METADATA``:
public English text, present offline. This keeps the paragraphs that read as prose (few code
characters, mostly words), strips inline markup, and writes JSONL ``{"text", "source"}``: every
fifth passage to ``passages-eval.jsonl`` (held out from calibration), the rest to
``passages-calib.jsonl``.

    python scripts/extract_passages.py --out optimizer --limit 400
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import sysconfig
from email.parser import Parser
from pathlib import Path

_MARKUP = [(re.compile(r"!?\[([^\]]*)\]\([^)]*\)"), r"\1"),  # markdown links and images
           (re.compile(r"`+([^`]*)`+_?"), r"\1"),             # inline code / rst links
           (re.compile(r"\*\*?([^*]+)\*\*?"), r"\1"),
           (re.compile(r"<[^>]+>"), " "),                      # html tags
           (re.compile(r"\s+"), " ")]
_WORD = re.compile(r"^[A-Za-z][A-Za-z'\-]*[.,;:!?)]?$")


def clean(par: str) -> str:
    for pat, rep in _MARKUP:
        par = pat.sub(rep, par)
    return par.strip()


def is_prose(par: str) -> bool:
    words = par.split()
    if not 40 <= len(words) <= 200:
        return False
    wordy = sum(bool(_WORD.match(w)) for w in words) / len(words)
    code = sum(par.count(c) for c in "{}[]=_/\\|#$>") / len(par)
    return wordy > 0.85 and code < 0.01 and par[0].isupper() and par.rstrip()[-1] in ".!?"


def site_dirs() -> list[Path]:
    """The environment's site-packages and the base interpreter's, without duplicates."""
    dirs = {Path(sysconfig.get_paths()["purelib"]),
            Path(sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_prefix})["purelib"])}
    return sorted(d for d in dirs if d.is_dir())


def passages(sites: list[Path]):
    metas = sorted({m.parent.name.lower(): m for s in sites for m in s.glob("*.dist-info/METADATA")}.items())
    for _, meta in metas:
        msg = Parser().parsestr(meta.read_text(encoding="utf-8", errors="replace"))
        body = msg.get_payload() or ""
        name = msg.get("Name", meta.parent.name)
        for par in re.split(r"\n\s*\n", body):
            if par.lstrip().startswith(("    ", "\t", ">>>", "$", "..", "|", "-", "*", "+")):
                continue
            text = clean(par)
            if is_prose(text):
                yield {"text": text, "source": f"{name} (METADATA)"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="optimizer", help="folder for passages-calib.jsonl and passages-eval.jsonl")
    ap.add_argument("--limit", type=int, default=400)
    ap.add_argument("--per-package", type=int, default=12)
    args = ap.parse_args(argv)
    seen, count, per = set(), 0, {}
    lines = []
    for p in passages(site_dirs()):
        if p["text"] in seen or per.get(p["source"], 0) >= args.per_package:
            continue
        seen.add(p["text"])
        per[p["source"]] = per.get(p["source"], 0) + 1
        lines.append(json.dumps(p, ensure_ascii=False))
        count += 1
        if count >= args.limit:
            break
    out = Path(args.out)
    (out / "passages-eval.jsonl").write_text("\n".join(lines[::5]) + "\n", encoding="utf-8")
    (out / "passages-calib.jsonl").write_text("\n".join(l for i, l in enumerate(lines) if i % 5) + "\n",
                                              encoding="utf-8")
    print(f"{count} passages from {len(per)} packages -> {args.out}")


if __name__ == "__main__":
    main()
