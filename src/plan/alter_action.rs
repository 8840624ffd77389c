//! What each `ALTER TABLE` subcommand does, as far as planning is concerned: PostgreSQL's
//! parse tree of one subcommand (and its tokens, for the spans of a `USING` expression)
//! turned into an [`Action`].

use std::ops::Range;

use pg_query::NodeEnum;
use pg_query::protobuf::{AlterTableType, ConstrType, DropBehavior, Token};

use super::parse::{Action, ConstraintIndex, NewConstraint, Tok, string_list};

/// The span after a top-level `USING` keyword, up to the end of the subcommand.
fn using_span(piece: &[Tok]) -> Option<Range<usize>> {
    let mut depth = 0i32;
    for (i, t) in piece.iter().enumerate() {
        if t.is(Token::Ascii40) || t.is(Token::Ascii91) {
            depth += 1;
        } else if t.is(Token::Ascii41) || t.is(Token::Ascii93) {
            depth -= 1;
        } else if depth == 0 && t.is(Token::Using) && i + 1 < piece.len() {
            return Some(piece[i + 1].start..piece[piece.len() - 1].end);
        }
    }
    None
}

fn constraint_kind(contype: i32) -> Option<NewConstraint> {
    match ConstrType::try_from(contype).ok()? {
        ConstrType::ConstrCheck => Some(NewConstraint::Check),
        ConstrType::ConstrNotnull => Some(NewConstraint::NotNull),
        ConstrType::ConstrForeign => Some(NewConstraint::ForeignKey),
        ConstrType::ConstrUnique => Some(NewConstraint::Unique),
        ConstrType::ConstrPrimary => Some(NewConstraint::PrimaryKey),
        ConstrType::ConstrExclusion => Some(NewConstraint::Exclusion),
        _ => None,
    }
}

pub(super) fn action(cmd: &pg_query::protobuf::AlterTableCmd, piece: &[Tok]) -> Action {
    use AlterTableType as T;
    let column = cmd.name.clone();
    let cascade = cmd.behavior == DropBehavior::DropCascade as i32;
    let def = cmd.def.as_ref().and_then(|d| d.node.as_ref());
    let meta = |what: &str| Action::Metadata { what: what.into(), column: None };
    let col_meta = |what: &str| Action::Metadata { what: what.into(), column: Some(cmd.name.clone()) };
    let Ok(subtype) = T::try_from(cmd.subtype) else {
        return Action::Unsupported { what: format!("subcommand type {}", cmd.subtype) };
    };
    match subtype {
        T::AtAddColumn => {
            let Some(NodeEnum::ColumnDef(col)) = def else {
                return Action::Unsupported { what: "ADD COLUMN without a definition".into() };
            };
            let mut has_default = col.raw_default.is_some();
            let mut not_null = col.is_not_null;
            let mut generated = !col.generated.is_empty();
            let mut identity = !col.identity.is_empty();
            let mut constraints = Vec::new();
            for c in &col.constraints {
                let Some(NodeEnum::Constraint(c)) = c.node.as_ref() else { continue };
                match ConstrType::try_from(c.contype) {
                    Ok(ConstrType::ConstrDefault) => has_default = true,
                    Ok(ConstrType::ConstrNotnull) => not_null = true,
                    Ok(ConstrType::ConstrGenerated) => generated = true,
                    Ok(ConstrType::ConstrIdentity) => identity = true,
                    _ => constraints.extend(constraint_kind(c.contype)),
                }
            }
            Action::AddColumn { column: col.colname.clone(), has_default, not_null, constraints, generated, identity }
        }
        T::AtDropColumn => Action::DropColumn { column, cascade },
        T::AtColumnDefault if def.is_some() => Action::SetDefault { column },
        T::AtColumnDefault => Action::DropDefault { column },
        T::AtAlterColumnType => Action::AlterType { column, using: using_span(piece) },
        T::AtSetNotNull => Action::SetNotNull { column },
        T::AtDropNotNull => Action::DropNotNull { column },
        T::AtSetExpression => Action::SetExpression { column },
        T::AtDropExpression => Action::DropExpression { column },
        T::AtAddConstraint => {
            let Some(NodeEnum::Constraint(c)) = def else {
                return Action::Unsupported { what: "ADD CONSTRAINT without a definition".into() };
            };
            let Some(constraint) = constraint_kind(c.contype) else {
                return Action::Unsupported { what: "this kind of constraint".into() };
            };
            let mut columns = string_list(&c.keys);
            columns.extend(string_list(&c.fk_attrs));
            let builds_index = matches!(constraint, NewConstraint::Unique | NewConstraint::PrimaryKey)
                && c.indexname.is_empty()
                && c.access_method.is_empty()
                && c.where_clause.is_none();
            let index = builds_index.then(|| ConstraintIndex::of(c, constraint == NewConstraint::PrimaryKey));
            Action::AddConstraint {
                index,
                name: (!c.conname.is_empty()).then(|| c.conname.clone()),
                constraint,
                not_valid: c.skip_validation,
                using_index: !c.indexname.is_empty(),
                columns,
            }
        }
        T::AtValidateConstraint => Action::ValidateConstraint { name: column },
        T::AtDropConstraint => Action::DropConstraint { name: column, cascade },
        T::AtAlterConstraint => {
            let name = match def {
                Some(NodeEnum::AtalterConstraint(a)) => a.conname.clone(),
                Some(NodeEnum::Constraint(c)) => c.conname.clone(),
                _ => column,
            };
            Action::AlterConstraint { name }
        }
        T::AtSetStatistics => col_meta("SET STATISTICS"),
        T::AtSetOptions | T::AtResetOptions => col_meta("column options"),
        T::AtSetStorage => col_meta("SET STORAGE"),
        T::AtSetCompression => col_meta("SET COMPRESSION"),
        T::AtAddIdentity => col_meta("ADD GENERATED AS IDENTITY"),
        T::AtSetIdentity => col_meta("identity options"),
        T::AtDropIdentity => col_meta("DROP IDENTITY"),
        T::AtSetRelOptions | T::AtResetRelOptions | T::AtReplaceRelOptions => meta("storage parameters"),
        T::AtChangeOwner => meta("OWNER TO"),
        T::AtClusterOn => meta("CLUSTER ON"),
        T::AtDropCluster => meta("SET WITHOUT CLUSTER"),
        T::AtEnableTrig
        | T::AtEnableAlwaysTrig
        | T::AtEnableReplicaTrig
        | T::AtDisableTrig
        | T::AtEnableTrigAll
        | T::AtDisableTrigAll
        | T::AtEnableTrigUser
        | T::AtDisableTrigUser => meta("ENABLE/DISABLE TRIGGER"),
        T::AtEnableRule | T::AtEnableAlwaysRule | T::AtEnableReplicaRule | T::AtDisableRule => {
            meta("ENABLE/DISABLE RULE")
        }
        T::AtEnableRowSecurity | T::AtDisableRowSecurity | T::AtForceRowSecurity | T::AtNoForceRowSecurity => {
            meta("ROW LEVEL SECURITY")
        }
        T::AtReplicaIdentity => meta("REPLICA IDENTITY"),
        T::AtSetLogged => Action::Rewrite { what: "SET LOGGED".into() },
        T::AtSetUnLogged => Action::Rewrite { what: "SET UNLOGGED".into() },
        T::AtSetTableSpace => Action::Rewrite { what: "SET TABLESPACE".into() },
        T::AtSetAccessMethod => Action::Rewrite { what: "SET ACCESS METHOD".into() },
        T::AtAddInherit | T::AtDropInherit => Action::Unsupported { what: "INHERIT / NO INHERIT".into() },
        T::AtAddOf | T::AtDropOf => Action::Unsupported { what: "OF / NOT OF".into() },
        T::AtAttachPartition | T::AtDetachPartition | T::AtDetachPartitionFinalize => {
            Action::Unsupported { what: "ATTACH / DETACH PARTITION".into() }
        }
        T::AtGenericOptions | T::AtAlterColumnGenericOptions => {
            Action::Unsupported { what: "OPTIONS (foreign tables)".into() }
        }
        other => Action::Unsupported { what: other.as_str_name().to_owned() },
    }
}
