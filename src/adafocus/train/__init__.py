"""Training AdaFocusV3 on the synthetic "find the detail" task, and its held-out evaluation."""
