"""Local detection: the rules run on every SIP packet and the book of what they found."""
