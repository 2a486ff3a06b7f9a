"""audio: codecs, resampling, VAD, ASR and TTS. numpy in, numpy out; no asyncio."""
