"""int8 quantization: static QDQ (calibrated), dynamic, and weight-only modes."""
