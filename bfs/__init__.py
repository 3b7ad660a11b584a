"""BFS: the replicated NFS-like file system (arrives with the file-system issue)."""
