"""Examples of user models under mutransfer (each with its model spec)."""
