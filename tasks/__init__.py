"""One Prefect task per stage: thin adapters over gpt/ and storage/."""
