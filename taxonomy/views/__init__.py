"""Views: other surveys' classifications mapped onto the primary tree (data files only)."""
