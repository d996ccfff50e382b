"""HTTP/JSON transport: OpenRLHF's /get_reward and vLLM's /classify on the reward server's engine."""
