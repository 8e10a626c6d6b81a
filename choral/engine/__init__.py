"""The engine: sequences, the model runner (every tensor and device call) and the LLM loop."""
