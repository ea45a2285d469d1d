"""HOMER 7 HEPSUB agent that flags APIBAN-listed SIP attackers in captured calls."""

__version__ = "0.1.0"
