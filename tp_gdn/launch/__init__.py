"""Starting the ranks: local processes, torchrun, or Ray actors."""
