"""Decision process: scores in, one verdict per captured frame out (accept, reject or failsafe)."""
