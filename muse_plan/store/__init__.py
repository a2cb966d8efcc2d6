"""The plan store: SQLModel tables and the functions that read and write them."""
