"""The APIBAN side: the client of apiban.org, one verdict per IP, the mirrored list."""
