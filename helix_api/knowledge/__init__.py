"""Knowledge bases: documents a user's chats draw on, and retrieval over them."""
