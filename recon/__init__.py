"""recon package."""
