"""The wire formats: HEP and the SIP fields the agent reads; pure functions."""
