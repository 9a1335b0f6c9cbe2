"""How good and how trustworthy: metrics, scoring, Grad-CAM, robustness, reports, shortcut audit."""
