"""The model: CLIP backbones (open_clip, OpenAI archives, tiny) and prompt-aware text encoding."""
