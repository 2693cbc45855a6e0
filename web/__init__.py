"""The web layer: the page, its chat service and view model. The only package that imports gradio;
it never imports torch or onnxruntime (the engine in `hybrid/` does the work)."""
