"""Rewrite ordinary image layers and images into seekable (eStargz) ones."""
