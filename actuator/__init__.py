"""lineguard-actuator: from a verdict to a rejected part (reject gate, PLC handshake, vision-fault action)."""
