"""Tests of the deployment files: docker-compose.yml and the Dockerfile."""
