"""The pipeline steps, side by side: one module per step (`run_<step>` and its summary).

Each reads and writes through the data layer (`cbir.store`) and computes with the kernels
(imaging, model, faiss_index, metrics, ...). A step imports another only where it consumes that
step's computation (query and calibrate embed pictures; calibrate ranks as evaluate does; pairs
asks calibrate for the threshold; report shows evaluation and calibration).
"""
