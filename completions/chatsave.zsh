#compdef chatsave

_chatsave_completion() {
  eval $(env _TYPER_COMPLETE_ARGS="${words[1,$CURRENT]}" _CHATSAVE_COMPLETE=complete_zsh chatsave)
}

compdef _chatsave_completion chatsave
