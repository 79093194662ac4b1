"""Value taps: run a graph and keep what a pass or calibration looks at.

    tap = Tap(gm, values=["linear_3"], args=attention_nodes, stop="linear_7")
    out = tap.run_feed(feed, input_names)     # None when stopped early
    tap.values["linear_3"], tap.args["attention_2"]

``values``: the outputs of the named nodes. ``args``: the resolved positional arguments of the
named nodes (an attention op's q, k, v, mask ...), kept in ``tap.args`` or, with ``on_args``,
handed to ``on_args(node, args)`` as the run reaches them and not kept (calibration statistics
over long windows stream this way). ``stop``: the run ends after that node (a GPTQ group needs
the graph only up to its inputs). ``mark``: the values live just before that node runs are kept
(``tap.marked``), and a later run can resume there (``run_feed(..., resume=tap.marked)``) instead
of from the inputs, reading the weights anew: GPTQ's layer-by-layer loop runs each group from the
previous one, not the whole graph again. With autograd enabled the kept tensors carry gradients (QAT
losses on attention maps read them). One helper for what rsq's Hessians, edgeqat's attention
loss, still's teacher activations and the calibration statistics all record.
"""
from __future__ import annotations

from typing import Callable

import torch

__all__ = ["Tap"]


class _Stop(Exception):
    pass


class Tap(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, values=(), args=(), stop: str | None = None,
                 on_args: Callable[[torch.fx.Node, tuple], None] | None = None, mark: str | None = None):
        super().__init__(gm)
        self.watch_values, self.watch_args, self.stop, self.on_args = set(values), set(args), stop, on_args
        self.mark = mark
        self.values: dict[str, torch.Tensor] = {}
        self.args: dict[str, tuple] = {}
        self.marked: tuple[str, dict] | None = None

    def run_node(self, node):
        if node.name == self.mark:   # weights (get_attr) are not kept: a resumed run reads them again
            self.marked = (node.name, {n: v for n, v in self.env.items() if n.op != "get_attr"})
        if node.name in self.watch_args:
            args = self.fetch_args_kwargs_from_env(node)[0]
            if self.on_args is not None:
                self.on_args(node, args)
            else:
                self.args[node.name] = args
        out = super().run_node(node)
        if node.name in self.watch_values:
            self.values[node.name] = out
        if node.name == self.stop:
            raise _Stop
        return out

    def run_feed(self, feed: dict, input_names, resume: tuple[str, dict] | None = None) -> tuple | None:
        """Run on ``feed`` (inputs in ``input_names`` order); the graph's outputs as a tuple, or
        None when the run stopped at ``stop``. Forgets what the previous run kept. ``resume``: a
        ``marked`` state of this graph on this feed; the run starts at its node, every node before
        it taken as computed (a watched value among them is read from the state)."""
        self.values, self.args, self.marked = {}, {}, None
        env = None
        if resume is not None:
            at, live = resume
            env = {}
            for node in self.graph.nodes:
                if node.name == at:
                    break
                if node.op != "get_attr":
                    env[node] = live.get(node)   # dead values stay None: nothing after the mark reads them
                    if node.name in self.watch_values:
                        self.values[node.name] = live[node]
        try:
            out = self.run(*[feed[n] for n in input_names], initial_env=env)
        except _Stop:
            return None
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)
