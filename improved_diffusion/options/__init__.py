"""The one table of options: an option's definition and the table built from them."""
