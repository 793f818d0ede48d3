"""RefCOCO / RefCOCO+ / RefCOCOg with masks, and RefShapes, as a TFDS dataset without TensorFlow.

Entry points: ``tfds_refcoco.records`` (prepare / data_source / decode_example) and
``python -m tfds_refcoco.build``. Importing the package itself loads nothing heavy.
"""
