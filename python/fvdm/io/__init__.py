"""What fvdm writes and reads back: atomic files and JSON records (atomic), videos and frame
grids (pixels), plots (plots)."""
