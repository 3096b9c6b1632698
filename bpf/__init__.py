"""BPF C programs (bpf/*.bpf.c) and the headers shared with their Python loader."""
