"""The merge engine: pure tensor kernels, a streaming reader and writer, and the plan executor.

It never touches the database, Celery or the network: it gets a plan and file paths, and writes a folder.
"""
