"""qwen3stream.v1: the Recognizer service (``asr.proto``) and its generated modules."""
