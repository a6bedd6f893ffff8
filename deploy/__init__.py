"""Deployment files and the local development support (``deploy.devsupport``, ``python -m deploy.run``)."""
