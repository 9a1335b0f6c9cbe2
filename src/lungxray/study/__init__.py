"""The study: named experiments compared honestly, and its report."""
