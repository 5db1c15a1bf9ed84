"""How the plugin gets into a script: import hook, patching, launcher, doctor."""
