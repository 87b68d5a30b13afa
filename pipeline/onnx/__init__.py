"""ONNX: every fitted generator as a self-contained file (:mod:`pipeline.onnx.export`), and `dip render`,
which re-renders them with onnxruntime (:mod:`pipeline.onnx.render`); a tiled image (or an ensemble) is one
model per tile plus a ``<stem>.tiles.json`` layout that both read and write."""
