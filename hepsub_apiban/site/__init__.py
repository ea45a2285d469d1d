"""The site API: what the site's firewalls are told, behind one key gate."""
