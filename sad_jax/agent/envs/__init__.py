"""Environments: the protocol (`base`), one module per adapter (`twx`, `textworld_env`,
`math_env`), and the registry (`registry.make_env`). Nothing is imported here, so an adapter
importing `base` never runs the registry."""
