"""Sessions and their files: starting and continuing chats, uploads, training data, scores."""
