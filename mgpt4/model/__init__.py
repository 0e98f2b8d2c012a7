"""The MiniGPT-4 model: EVA ViT + ln_vision + Q-Former + llama_proj + a Llama-family LLM."""
