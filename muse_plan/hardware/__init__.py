"""What a machine has: the GPU catalog and detection of local hardware."""
