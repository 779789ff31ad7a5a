"""faar_serve: the HTTP gateway for an exported FAAR model repository.

Torch-free by design: it reads ``<repo>/<model>/config.pbtxt`` and
``<repo>/<model>/<version>/manifest.json`` and runs ``model.onnx`` in ONNX Runtime, or
forwards to a Triton Inference Server and reads the same manifest from Triton's model
configuration; it never imports the ``faar`` training package.
"""
