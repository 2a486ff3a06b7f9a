"""The end-to-end voice benchmark (`voice-agent bench e2e`) in parts.

- `prompts`: the fixed spoken prompts, synthesized at bench time with piper and espeak-ng into a
  cache folder (never into the repository), and the energy-based end of speech of each.
- `callers`: simulated callers that stream a prompt in real time over `/v1/realtime` or `/twilio`
  and time the silence until the first reply audio.
- `servers`: a `voice-agent serve` subprocess per configuration, or a running server by URL.
- `report`: percentiles, the table, the JSON document and the PNG figure.
"""
