"""What users run around the pipeline, outside the core: the command line (`cli`), the demo
(`demo`), the inspection API (`inspection`: ``hcpass.mixers``, ``hcpass.gain``) and
pictures (`plot`)."""
