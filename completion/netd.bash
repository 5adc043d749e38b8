# bash completion for netd(8): its commands, their options, config files for -c, any
# file for `netd import`, and for `netd status` the names of the services in the config
# (from `netd check --names`).
# Installed as /usr/share/bash-completion/completions/netd by the Debian package and as
# /usr/local/share/bash-completion/completions/netd by scripts/install.sh.

_netd()
{
    local cur prev words cword
    _init_completion || return

    # The sub-command is the first word that is neither an option nor -c's argument.
    local command="" config="" i
    for ((i = 1; i < cword; i++)); do
        case ${words[i]} in
            -c | --config) config=${words[i + 1]}; ((i++)) ;;
            -*) ;;
            *) [[ -z $command ]] && command=${words[i]} ;;
        esac
    done

    case $prev in
        -c | --config)
            _filedir '@(yaml|yml|conf)'
            return
            ;;
        --timeout)
            return
            ;;
    esac

    local options
    case $command in
        "")
            if [[ $cur == -* ]]; then
                COMPREPLY=($(compgen -W '--help --version' -- "$cur"))
            else
                COMPREPLY=($(compgen -W 'run start stop reload status check import' -- "$cur"))
            fi
            return
            ;;
        run | start | reload) options='--config --help' ;;
        stop) options='--config --timeout --help' ;;
        check) options='--config --names --help' ;;
        status)
            options='--config --json --help'
            if [[ $cur != -* ]]; then
                local names
                names=$(netd check --names ${config:+-c "$config"} 2>/dev/null)
                COMPREPLY=($(compgen -W "$names" -- "$cur"))
                return
            fi
            ;;
        import)
            # xinetd service files, xinetd.conf or inetd.conf: any file.
            if [[ $cur == -* ]]; then
                COMPREPLY=($(compgen -W '--help' -- "$cur"))
            else
                _filedir
            fi
            return
            ;;
        *) return ;;
    esac
    if [[ $cur == -* ]]; then
        COMPREPLY=($(compgen -W "$options" -- "$cur"))
    fi
} &&
    complete -F _netd netd
