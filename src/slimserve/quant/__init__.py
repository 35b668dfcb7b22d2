"""Weight (and activation) quantization: RTN, GPTQ, packed storage and quantized Linear layers."""
