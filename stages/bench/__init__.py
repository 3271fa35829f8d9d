"""The benchmarks behind `replaykd bench` and `replaykd bench-scale`: they measure the commands, so unlike a command
they may run others (through `runner`); no command imports them."""
