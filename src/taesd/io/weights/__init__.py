"""Weight files: reading and writing every format (formats), telling what a file holds from its
shapes (identify), and finding a variant's weights (resolve)."""
