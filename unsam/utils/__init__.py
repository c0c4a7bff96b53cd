"""Command-line and distributed-launch glue shared by train_net.py and the demos."""
