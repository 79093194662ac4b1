"""The core: IR, capture, patterns, op set, pass manager, pipeline, bundle, report."""
