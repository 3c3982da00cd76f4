"""The API site (port 8000): routes, errors, header rules and the streaming proxy."""
