"""One thin module per TRL trainer."""
