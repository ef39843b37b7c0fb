"""Model card templates, shipped as package data of midol_hub."""
